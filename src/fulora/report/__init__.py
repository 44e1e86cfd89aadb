"""Report helpers that need a trained classifier: the t-SNE embedding figure."""
