"""Other servers' protocols on the native HTTP port, so existing trainers work unchanged.

One module per protocol; each imports `surfaces.common` (errors, auth), never another surface.
"""
