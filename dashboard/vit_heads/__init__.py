"""The vit-heads dashboard: the ViT page, its report sections and the figures they share."""
