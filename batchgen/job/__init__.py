"""The batch job: input lines -> requests -> engine -> result lines, resumable, never clobbering."""
