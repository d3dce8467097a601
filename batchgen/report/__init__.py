"""`batchgen report`: a run's metrics and result lines drawn as one offline HTML page."""
