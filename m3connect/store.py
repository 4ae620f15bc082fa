M3Store = None
connect = None
