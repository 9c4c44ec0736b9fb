"""The HTTP edge: the FastAPI ingress and its middlewares (``ingress``), the route table
(``routes``), the request bodies (``protocol``, ``classify_protocol``), the endpoints'
logic per served model (``openai_api``, ``classify_api``), limits checked before work
(``limits``, ``tokens``), response and stream formatting (``responses``, ``streaming``,
``tools``) and OpenAI-shaped errors (``errors``). Imports no torch."""
