"""Webhooks: a tenant's HTTP endpoints that receive signed job events (the Standard Webhooks specification).

Depends on core/tenants only. core/jobs records an event here in the transaction of each state change and of
each new checkpoint (`core.jobs.lifecycle.add_event`); this package knows nothing of jobs but the payload
it is handed, so the dependency runs one way: jobs → webhooks → tenants.
"""
