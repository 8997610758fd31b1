"""k-means label sets (the follow-up paper's groups), on top of the engine and the corpus."""
