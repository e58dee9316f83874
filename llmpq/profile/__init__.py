"""llmpq.profile: timing real layers (`run`, `timing`) and stage-to-stage links (`links`) of present hardware."""
