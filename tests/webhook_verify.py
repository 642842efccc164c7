"""Verifies webhook deliveries with the official openai SDK: reads {"secret", "events": [{"body",
"headers"}]} on stdin and prints, per event, `<type> <data.id>` as `client.webhooks.unwrap`
returns it, or `INVALID <reason>` when the SDK refuses it."""
import json
import sys

from openai import OpenAI

req = json.load(sys.stdin)
client = OpenAI(api_key="unused", webhook_secret=req["secret"])
for e in req["events"]:
    try:
        event = client.webhooks.unwrap(e["body"], e["headers"])
        print(event.type, event.data.id)
    except Exception as err:  # the SDK's InvalidWebhookSignatureError, or a parse error
        print("INVALID", type(err).__name__)
