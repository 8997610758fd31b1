"""The collection engine: model adapters, token selection, accumulation and the collect loop."""
