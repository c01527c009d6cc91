"""Small shared helpers: atomic file writes, hashing, seeding, device choice."""
