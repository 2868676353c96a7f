"""Hugging Face checkpoints in (``train.init_from=hf:PATH``, ``--checkpoint hf:PATH``) and out
(``export --format hf``): explicit tensor maps per family, no ``transformers`` at run time."""
