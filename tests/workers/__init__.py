"""Worker modules that tests start under horovodrun / torchrun (python -m tests.workers.<name>)."""
