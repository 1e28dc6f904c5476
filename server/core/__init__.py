"""The generation core every dialect shares: budgets, prompts, sampling, stop handling."""
