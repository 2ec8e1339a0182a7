"""Datasets, caches and loaders (MONAI), and the transforms and augmentation they apply."""
