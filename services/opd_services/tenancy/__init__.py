"""Many experiments, one teacher: the registry, API keys, Redis ACL users, authentication."""
