"""The server's routes, a FastAPI ``APIRouter`` per group (``create_app`` includes them all):

- ``chat``: POST /v1/chat/completions
- ``completions``: POST /v1/completions
- ``responses_api``: POST /v1/responses (OpenAI's Responses API, served as a chat completion)
- ``models``: GET /v1/models, GET /v1/models/{model_id}, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter
- ``tokenize``: GET /tokenizer_info, POST /tokenize, POST /detokenize
- ``admin``: GET /health, GET /metrics
"""
