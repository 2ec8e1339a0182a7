"""The data spec and the training recipe: every rule and every fix-it message lives here."""
