"""gunicorn settings: `gunicorn -c gunicorn.conf.py app:app` (SPEC section 1).

Worker model: gthread. A stream waiting on a slow provider holds one thread that sleeps in a
socket read, so concurrency is the thread count; idle keep-alive connections wait in gunicorn's
poller, not in a thread. See README "Streaming at scale" for the measurement behind the numbers.
"""
import multiprocessing
import os

from dotenv import load_dotenv

load_dotenv()

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '3000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count())))
worker_class = "gthread"
# Each in-flight request or stream holds a thread; most are parked in a socket read.
threads = int(os.environ.get("GUNICORN_THREADS", "512"))
# Open connections per worker (streams plus idle keep-alive ones); gunicorn's default of 1000
# would stall new connections well before the threads run out.
worker_connections = max(1000, threads * 2)
# Heartbeat timeout for a stuck worker (gthread's main loop keeps beating during long streams).
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
# Behind nginx, trust X-Forwarded-* from the local proxy only.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn 25+ opens a control socket by default ($HOME/.gunicorn/gunicorn.ctl, one path for every
# instance a user runs): an asyncio thread in the master, stopped and restarted around each worker
# fork. Nothing here uses gunicornc, so the master stays single-threaded.
control_socket_disable = True
accesslog = None  # the app writes its own JSON access line per request
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
