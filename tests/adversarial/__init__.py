"""The standing adversarial suite (issue 14): a generated corpus of bad inputs and planted identifiers, run through
the real pipeline. See generator.py for the cases and test_corpus.py for what is asserted."""
