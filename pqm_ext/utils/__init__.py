"""Small shared helpers: atomic outputs, input errors, logging."""
