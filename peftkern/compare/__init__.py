"""`peftkern compare`: fine-tune one pretrained model with each method and measure them."""
