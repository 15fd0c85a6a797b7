"""The rollout audit: every offline detector on one model, one verdict, and its JSON/HTML report."""
