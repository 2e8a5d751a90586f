"""The photo-ID researcher's loop: identify new photos against the catalogue, review them, accept them."""
