"""Operations tools that are not part of the serving library (not installed with the package)."""
