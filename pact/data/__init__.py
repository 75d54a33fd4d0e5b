"""Data: where rows come from (files, folders, hub datasets), their formats, chat-template tokenization, and the
batch type every loss consumes. The bottom layer with `pact.models`: it imports only the cross-cutting modules."""
