"""What every asyncinfer process agrees on: settings, Redis keys, jobs, model specs, errors."""
