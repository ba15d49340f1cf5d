"""Speech-to-text service (port 8082): routes (`http`), form parsing (`request`), result
layout and formats (`response`), the model-thread policy (`decode`) and Whisper (`runner`)."""
