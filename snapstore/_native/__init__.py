"""Home of native executables built at install time (the uffd page loader)."""
