"""The broker side: the embedded broker's process and topic administration."""
from aggregator.broker.admin import ensure_topics, partition_counts
from aggregator.broker.embedded import BrokerAddress, BrokerError, EmbeddedBroker, free_port

__all__ = ["BrokerAddress", "BrokerError", "EmbeddedBroker", "ensure_topics", "free_port", "partition_counts"]
