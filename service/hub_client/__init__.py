"""The bot's Hub client: a client that sends exactly the token it is given (``hub``), one
commit per job found again on a retry, and which Hub failures are retried and for how long
(``retry``). The workflows push through it and the intake asks the Hub through it; it imports
only the engine and ``service.errors``.
"""
