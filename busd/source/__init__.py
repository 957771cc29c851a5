"""The only package that talks to nats-py (a test checks that nothing else in busd imports
``nats``): connecting (``connect``), the pull loop and settlement (``pull``), declaring the
stream and consumer and the rest of what busd asks of JetStream (``admin``).

Every public name is re-exported here, so callers write ``source.connect(...)``.
"""

from busd.source.admin import DUPLICATE_WINDOW_S as DUPLICATE_WINDOW_S
from busd.source.admin import MAX_MSG_BYTES as MAX_MSG_BYTES
from busd.source.admin import BindOnlyMissing as BindOnlyMissing
from busd.source.admin import Bucket as Bucket
from busd.source.admin import ack_floor as ack_floor
from busd.source.admin import add_reader as add_reader
from busd.source.admin import backoff_s as backoff_s
from busd.source.admin import broken_promises as broken_promises
from busd.source.admin import consumer_config as consumer_config
from busd.source.admin import consumer_limits as consumer_limits
from busd.source.admin import consumer_state as consumer_state
from busd.source.admin import delete_consumer as delete_consumer
from busd.source.admin import delivered_seq as delivered_seq
from busd.source.admin import ensure_consumer as ensure_consumer
from busd.source.admin import ensure_stream as ensure_stream
from busd.source.admin import lag_age_s as lag_age_s
from busd.source.admin import next_stored_seq as next_stored_seq
from busd.source.admin import oldest_unsettled_age_s as oldest_unsettled_age_s
from busd.source.admin import redeclare_consumer as redeclare_consumer
from busd.source.admin import stored_payload as stored_payload
from busd.source.admin import stream_bounds as stream_bounds
from busd.source.admin import stream_config as stream_config
from busd.source.connect import WAITING_RETRY_S as WAITING_RETRY_S
from busd.source.connect import WAITING_SAID_EVERY_S as WAITING_SAID_EVERY_S
from busd.source.connect import Client as Client
from busd.source.connect import NatsUnreachable as NatsUnreachable
from busd.source.connect import Waiting as Waiting
from busd.source.connect import api_prefix as api_prefix
from busd.source.connect import connect as connect
from busd.source.connect import connection_name as connection_name
from busd.source.connect import jetstream as jetstream
from busd.source.connect import jetstream_patience_s as jetstream_patience_s
from busd.source.connect import jetstream_silent as jetstream_silent
from busd.source.connect import js_api_prefix as js_api_prefix
from busd.source.connect import refusal as refusal
from busd.source.connect import request as request
from busd.source.connect import turned_away as turned_away
from busd.source.connect import unanswered as unanswered
from busd.source.pull import PullSource as PullSource
from busd.source.pull import Settler as Settler
from busd.source.pull import parse_ack_subject as parse_ack_subject
