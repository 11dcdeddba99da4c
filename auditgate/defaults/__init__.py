# The shipped defaults (package data): copied to rules/ at first start, never edited in place.
