"""opd-services: the teacher service, scorer workers, reference trainer and tenancy."""
__version__ = "0.1.0"
