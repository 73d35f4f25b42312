"""The bottom layer beside `config` and `errors`: what every upper layer shares and none may own — process-group
queries and collectives, device selection, and batched prediction with classification metrics. Imports only torch
and `errors`."""
