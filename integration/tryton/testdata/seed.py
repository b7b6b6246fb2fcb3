#!/usr/bin/python3
"""Seed a Tryton 6.0 database for dealbridge's acceptance tests.

Run it with Debian's /usr/bin/python3 (where the tryton-proteus package
installs proteus) on a database that `trytond-admin -u account_invoice
--activate-dependencies` has initialised, before trytond serves it:

    /usr/bin/python3 seed.py --config trytond.conf --database erp_seed \
        --crm-password-file crm.pass

It creates, looking each thing up first so that a re-run is harmless:
USD and EUR, the company "Acme Test Company", the minimal English chart of
accounts, fiscal years (this year and next) with periods and a strict
invoice sequence, the payment term "Net 30", customers, products and the API
user "crm" (groups Account and Party Administration). It prints the ids it
used as JSON on stdout, for logs only: the Go client looks everything up by
code, never by id.

Customers (party code → what it is for):
  C-1       Globex Corporation, with an address
  C-2       Initech, with an address and the identifier CRM-2 (for the
            identifier mapping)
  C-NOADDR  No Address Ltd, without any address: Tryton refuses to create
            its invoices ("A value is required for field Invoice Address")
Products (code): SKU-1 Widget, SKU-2 Gadget, CRM-DEAL (services whose
category carries the revenue account).
"""
import argparse
import datetime
import json
import sys
from decimal import Decimal


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--config', required=True)
    p.add_argument('--database', required=True)
    p.add_argument('--crm-password-file', required=True)
    args = p.parse_args()
    with open(args.crm_password_file) as f:
        crm_password = f.read().strip()

    from proteus import Model, Wizard, config
    config.set_trytond(database=args.database, config_file=args.config)

    Party = Model.get('party.party')
    Company = Model.get('company.company')
    FiscalYear = Model.get('account.fiscalyear')
    PaymentTerm = Model.get('account.invoice.payment_term')
    Category = Model.get('product.category')
    Uom = Model.get('product.uom')
    Template = Model.get('product.template')
    Product = Model.get('product.product')
    User = Model.get('res.user')
    Group = Model.get('res.group')
    Account = Model.get('account.account')

    Currency = Model.get('currency.currency')
    Rate = Model.get('currency.currency.rate')
    Sequence = Model.get('ir.sequence')
    SequenceStrict = Model.get('ir.sequence.strict')
    SequenceType = Model.get('ir.sequence.type')
    ModelData = Model.get('ir.model.data')
    AccountTemplate = Model.get('account.account.template')

    def currency(code, name, symbol, rate):
        found = Currency.find([('code', '=', code)])
        if found:
            return found[0]
        cur = Currency(name=name, symbol=symbol, code=code,
            rounding=Decimal('0.01'))
        cur.save()
        Rate(date=datetime.date(2000, 1, 1), rate=rate, currency=cur).save()
        return cur

    usd = currency('USD', 'U.S. Dollar', '$', Decimal('1'))
    currency('EUR', 'Euro', '€', Decimal('0.9'))

    companies = Company.find([('party.name', '=', 'Acme Test Company')])
    if companies:
        company, = companies
    else:
        party = Party(name='Acme Test Company')
        party.save()
        wizard = Wizard('company.company.config')
        wizard.execute('company')
        wizard.form.party = party
        wizard.form.currency = usd
        wizard.execute('add')
        company, = Company.find([('party.name', '=', 'Acme Test Company')])
    # The admin's context gets the company, as the client's would.
    config.get_config()._context = User.get_preferences(True, {})

    if not Account.find([('company', '=', company.id)]):
        data, = ModelData.find([('module', '=', 'account'),
                ('fs_id', '=', 'account_template_root_en')], limit=1)
        chart = Wizard('account.create_chart')
        chart.execute('account')
        chart.form.account_template = AccountTemplate(data.db_id)
        chart.form.company = company
        chart.execute('create_account')
        receivable, = Account.find([('type.receivable', '=', True),
                ('company', '=', company.id)], limit=1)
        payable, = Account.find([('type.payable', '=', True),
                ('company', '=', company.id)], limit=1)
        chart.form.account_receivable = receivable
        chart.form.account_payable = payable
        chart.execute('create_properties')
    accounts = {}
    for kind in ('receivable', 'revenue'):
        accounts[kind], = Account.find([('type.%s' % kind, '=', True),
                ('company', '=', company.id)], limit=1)

    this_year = datetime.date.today().year
    for year in (this_year, this_year + 1):
        if FiscalYear.find([('name', '=', str(year)),
                ('company', '=', company.id)]):
            continue
        move_type, = SequenceType.find([('name', '=', 'Account Move')],
            limit=1)
        move_seq = Sequence(name=str(year), sequence_type=move_type,
            company=company)
        move_seq.save()
        invoice_type, = SequenceType.find([('name', '=', 'Invoice')],
            limit=1)
        invoice_seq = SequenceStrict(name='Invoices %d' % year,
            sequence_type=invoice_type, company=company,
            prefix='INV/%d/' % year, padding=5)
        invoice_seq.save()
        fy = FiscalYear(name=str(year), company=company,
            start_date=datetime.date(year, 1, 1),
            end_date=datetime.date(year, 12, 31),
            post_move_sequence=move_seq)
        seq, = fy.invoice_sequences
        seq.out_invoice_sequence = invoice_seq
        seq.in_invoice_sequence = invoice_seq
        seq.out_credit_note_sequence = invoice_seq
        seq.in_credit_note_sequence = invoice_seq
        fy.save()
        fy.click('create_period')

    terms = PaymentTerm.find([('name', '=', 'Net 30')])
    if terms:
        term, = terms
    else:
        term = PaymentTerm(name='Net 30')
        line = term.lines.new(type='remainder')
        line.relativedeltas.new(days=30)
        term.save()

    def party(code, name, address=True, identifier=None):
        found = Party.find([('code', '=', code)])
        if found:
            return found[0]
        p = Party(name=name, code=code)
        # A new party gets one empty address by default: drop it.
        while p.addresses:
            p.addresses.pop()
        if address:
            p.addresses.new(street='1 %s Way' % name.split()[0],
                postal_code='12345', city='Springfield')
        if identifier:
            p.identifiers.new(code=identifier)
        p.customer_payment_term = term
        p.save()
        return p

    customers = {
        'C-1': party('C-1', 'Globex Corporation'),
        'C-2': party('C-2', 'Initech', identifier='CRM-2'),
        'C-NOADDR': party('C-NOADDR', 'No Address Ltd', address=False),
        }

    categories = Category.find([('name', '=', 'CRM services')])
    if categories:
        category, = categories
    else:
        category = Category(name='CRM services', accounting=True)
        category.account_revenue = accounts['revenue']
        category.save()
    unit, = Uom.find([('name', '=', 'Unit')])

    def product(code, name):
        found = Product.find([('code', '=', code)])
        if found:
            return found[0]
        t = Template(name=name, code=code, type='service',
            default_uom=unit, list_price=Decimal('0'),
            account_category=category)
        t.save()
        p, = t.products
        return p

    products = {c: product(c, n) for c, n in [
            ('SKU-1', 'Widget'), ('SKU-2', 'Gadget'),
            ('CRM-DEAL', 'CRM Deal')]}

    users = User.find([('login', '=', 'crm')])
    if users:
        crm, = users
    else:
        crm = User(name='CRM Sync', login='crm')
        for name in ('Account', 'Party Administration'):
            group, = Group.find([('name', '=', name)])
            crm.groups.append(group)
        crm.companies.append(Company(company.id))
        crm.company = Company(company.id)
    crm.password = crm_password
    crm.save()

    json.dump({
        'company': company.id,
        'currency': usd.id,
        'payment_term': term.id,
        'customers': {k: v.id for k, v in customers.items()},
        'products': {k: v.id for k, v in products.items()},
        'crm_user': crm.id,
        }, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
