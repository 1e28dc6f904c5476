"""OpenAI API dialect (/v1/*): wire shapes, routes and its error envelope."""
