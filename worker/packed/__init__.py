"""The forward-only packed path (embed, score, classify): first-fit-decreasing bins under
the token budget, staged to the device in one copy, run as one varlen forward each."""
