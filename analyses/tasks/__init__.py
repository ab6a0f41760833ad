"""Data generators for the analyses: natural text, repeated random tokens, and (later) task prompts."""
