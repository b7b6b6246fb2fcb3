package postgres

// LockDealStockSQL is exported to the tests, which check its lock order.
const LockDealStockSQL = lockDealStockSQL
