"""Label conventions shared by data and training."""

IGNORE_INDEX = -100  # labels with this value carry no loss (prompt tokens, padding)
