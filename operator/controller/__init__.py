"""What every kind's controller shares: the API client, the object cache, the work queue, the status
writer, the event poster, conditions, child-manifest helpers and the operator's metrics."""
