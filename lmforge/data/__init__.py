"""The data stage: ingest, clean, deduplicate, split and tokenize a corpus."""
