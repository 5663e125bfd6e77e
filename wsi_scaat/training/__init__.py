"""Training: one loop shared by every method; methods only form the loss."""
