"""The DuoAttention page and report section: the trained gate of every KV head, the training loss,
needle recall against the share of retrieval heads (Duo's gates, the retrieval score, random heads,
the full model), the KV-cache memory against context length and the gates' agreement with the
retrieval score."""
