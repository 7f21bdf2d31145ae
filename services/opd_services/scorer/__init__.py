"""The queue's scorer worker (`opd scorer`): rollouts -> teacher -> scored entries."""
