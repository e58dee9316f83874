"""The batch job: a prompts file in, completions out (`llmpq generate`)."""
