"""Dataset sources -> `.beton` files (FFCV) -> loaders for SSL views, weak augmentation and eval."""
