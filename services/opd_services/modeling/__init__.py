"""What serving and training share: checkpoint builders (the embedded default teacher, bench and
test models) and the KV-cached sampling loop with its parameters. Nothing of the demo task lives
here, and nothing here knows about requests, the queue or tenancy."""
