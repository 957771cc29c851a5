from busd.checker.wire import worker_main

worker_main()
