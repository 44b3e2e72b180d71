"""The admin API on FastAPI: ``app`` (the app factory and its errors), ``gate`` (authentication, roles, body
limits, the audit log), ``routing`` (how a route declares its role), the routers by area (``access``,
``models``, ``devices``, ``deployments``, ``observe``, ``events``, ``dashboard``) and ``serve`` (uvicorn in a
thread). ``cloud_hub.admin.AdminApi`` puts them together for the hub."""
