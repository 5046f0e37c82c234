"""Using a model: loading for inference, generation, scoring, evaluation, explanation, chat."""
